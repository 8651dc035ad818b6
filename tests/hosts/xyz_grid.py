"""Stand-in of A1111 v1.10 ``scripts/xyz_grid.py`` (Forge ships the same file): what extensions
touch. ``AxisOption(label, type, apply, format_value=format_value_add_label, confirm=None,
cost=0.0, choices=None, prepare=None)``, the module-level ``axis_options`` list, the CSV split
of str values (``csv_string_to_list_strip``), and the per-cell loop of ``Script.run``:
``pc = copy(p)``, each axis's ``apply(pc, x, xs)``, ``process_images(pc)``, after every axis's
``confirm(p, values)``. Loaded by path under the name ``xyz_grid.py``, as
``modules/script_loading.load_module`` loads every script file.
"""

import csv
from copy import copy
from io import StringIO
from itertools import chain


def format_value_add_label(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def do_nothing(p, x, xs):
    pass


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0,
                 choices=None, prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


axis_options = [AxisOption("Nothing", str, do_nothing), AxisOption("Seed", int, lambda p, x, xs: setattr(p, "seed", x))]


def csv_string_to_list_strip(data_str):
    return list(map(str.strip, chain.from_iterable(csv.reader(StringIO(data_str), skipinitialspace=True))))


def process_axis(p, opt, vals):
    """``Script.run.process_axis`` for str axes: CSV split, type, then ``confirm``."""
    values = [opt.type(x) for x in csv_string_to_list_strip(vals)]
    if opt.confirm:
        opt.confirm(p, values)
    return values


def run(p, axes, process_images):
    """``Script.run`` for up to three (label, values text) axes: every cell on a copy of p.
    Returns [(cell values, labels, result of process_images(pc))]."""
    opts = [next(o for o in axis_options if o.label == label) for label, _ in axes]
    lists = [process_axis(p, o, vals) for o, (_, vals) in zip(opts, axes)]
    cells = [[]]
    for values in lists:
        cells = [c + [v] for c in cells for v in values]
    out = []
    for cell in cells:
        pc = copy(p)
        for opt, x, xs in zip(opts, cell, lists):
            opt.apply(pc, x, xs)
        out.append((cell, [o.format_value(p, o, x) for o, x in zip(opts, cell)], process_images(pc)))
    return out
