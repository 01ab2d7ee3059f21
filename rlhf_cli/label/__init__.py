"""``rlhf label``: collect human preferences between two responses from the terminal.

Modules: ``records`` (the preference file: format, resume, append + fsync, undo), ``pairs`` (a pair,
its shown order, the row a judgement becomes), ``sources`` (generating the pairs from a run or two
models), ``selection`` (a reward model's uncertainty order and agreement), ``keys`` (single keys from
the terminal or a script), ``screen`` (the rich side-by-side view), ``session`` (the loop) and
``command`` (the command line).
"""
