"""The error a command raises when what it was asked cannot be done as asked (an option that does
not fit the checkpoint, an index outside the prompts, a VAE that does not match the latents). The
CLI reports it in one line as a usage error (exit status 2); any other ValueError is the command
failing (exit status 1). It imports nothing of the package."""


class RequestError(ValueError):
    """The request (its options, or the files they name) is refused before or while running."""
