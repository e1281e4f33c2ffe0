"""Edit instructions from captions: back-ends (rule, OpenAI-compatible HTTP, local
transformers), human exemplars, the versioned prompt, validation, and importers of existing
instruction files. The stage itself is ultracurate.stages.instruct."""

from .backends import BACKENDS, Answer, Backend, BackendSpec, Request  # noqa: F401
from .validation import NONE, Proposal, validate  # noqa: F401
