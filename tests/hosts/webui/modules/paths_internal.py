"""Stand-in: modules/paths_internal.py ``normalized_filepath`` (argparse type for folders)."""
import os


def normalized_filepath(filepath):
    return os.path.abspath(os.path.expanduser(filepath))
