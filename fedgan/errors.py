"""The root of FedGAN's user-facing errors.

Everything raised as a `FedGanError` carries a one-line message that names the
file or key at fault and the fix; the CLI prints it as is, without traceback.
"""


class FedGanError(Exception):
    """A refusal caused by input, configuration or environment, not a bug."""
