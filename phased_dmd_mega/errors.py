"""The errors a command raises about what it was asked or what it reads.

``RequestError``: what it was asked cannot be done as asked (an option that does not fit the
checkpoint, an index outside the prompts, a VAE that does not match the latents). The CLI reports
it in one line as a usage error (exit status 2).

``DamagedFileError``: a file the command reads is damaged (a truncated or corrupt safetensors
file, a shard its index names that is not on disk). Not a usage error: the command fails, one
line naming the file (and the tensor, when one tensor is at fault), exit status 1, as for any
other ValueError.

``RunStopped``: a training run stopped itself, with a checkpoint (too many non-finite steps in a
row, a collapse the monitor found): exit status 1 with the reason. It imports nothing of the
package."""


class RequestError(ValueError):
    """The request (its options, or the files they name) is refused before or while running."""


class DamagedFileError(ValueError):
    """A file that should hold weights or embeddings cannot be read: truncated, corrupt, or a
    shard its index names is missing. The message names the file."""


class RunStopped(ValueError):
    """The run stopped itself with a checkpoint (too many non-finite steps, a collapse): the
    command exits with the message, no traceback."""
