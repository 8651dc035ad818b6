"""Stand-in: modules/errors.py ``display`` / ``report`` print and never raise."""

DISPLAYED = []


def display(e, task, **kwargs):
    DISPLAYED.append((task, e))
    print(f"{task}: {type(e).__name__}: {e}")


def report(message, exc_info=False):
    DISPLAYED.append((message, None))
    print(message)
