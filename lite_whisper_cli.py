"""Entry points of the console scripts (`lite-whisper`, `lite-whisper-convert`, `lite-whisper-eval`,
`lite-whisper-mlx`).

`import lite_whisper` registers the model classes with transformers, which imports torch, transformers and
Whisper's model code (about 5 s on 2 CPU cores). A command must answer `--help` or a bad option without that, so
this launcher imports the command module with the registration deferred; the command registers the classes itself
once its arguments are parsed and it has work to do. It is a top-level module because importing anything inside
`lite_whisper` runs the package's `__init__` first.
"""

import importlib
import sys

deferring_registration = False


def _command_module(name):
    global deferring_registration
    deferring_registration = True
    try:
        return importlib.import_module(name)
    finally:
        deferring_registration = False


def main(argv=None):
    return _command_module("lite_whisper.cli").main(argv)


def convert_main(argv=None):
    return _command_module("lite_whisper.cli").convert_main(argv)


def eval_main(argv=None):
    return _command_module("lite_whisper.cli").eval_main(argv)


def mlx_main(argv=None):
    return _command_module("lite_whisper.mlx_port.cli").main(argv)


if __name__ == "__main__":
    sys.exit(main())
