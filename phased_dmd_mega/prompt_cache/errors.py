"""The error of encode-prompts, raised by every stage of the command."""


class PromptEncodingError(ValueError):
    """Bad input to encode-prompts; the message names the file or option at fault."""
