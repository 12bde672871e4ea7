"""sms: a peer-to-peer chat system. The subpackages live in the repository's top-level folders."""

__version__ = "0.1.0"
