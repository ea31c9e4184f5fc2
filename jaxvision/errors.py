"""The library's exception types. Each message names the file, key or value and says what to do."""


class JaxVisionError(Exception):
    """Base class for errors raised by jaxvision on bad input."""


class WeightLoadError(JaxVisionError):
    """A weight file is missing, unreadable, or does not match the model."""


class ConfigError(JaxVisionError, ValueError):
    """A model or run configuration is invalid (unknown key, wrong type, unsupported value)."""


class ImageDecodeError(JaxVisionError):
    """An image file could not be decoded."""
