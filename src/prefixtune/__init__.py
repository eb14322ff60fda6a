"""prefixtune: exact prefix-tuning and its soft-prompt family on frozen Hugging Face LMs."""

__version__ = "0.2.0"

from .config import PrefixConfig  # noqa: E402
from .engine import (  # noqa: E402
    RowPrefixes,
    describe,
    forward_with_prefix,
    generate_mixed,
    generate_with_prefix,
    layout_of,
    use_prefix,
)
from .methods import (  # noqa: E402
    METHODS,
    InfixConfig,
    InfixModel,
    Method,
    PrefixModel,
    PromptConfig,
    PromptModel,
    PTuningConfig,
    PTuningModel,
    attach,
    build,
    get_method,
    load_artifact,
    save_artifact,
    trainable_state,
)
from .methods.weights import WeightArtifact  # noqa: E402
from .models import load_model  # noqa: E402
from .peft_io import export_peft, import_peft  # noqa: E402
from .prefix import MergedPrefix, Prefix, PrefixFileError, load_prefix, save_prefix  # noqa: E402

__all__ = [
    "PrefixConfig", "PrefixModel", "RowPrefixes", "MergedPrefix", "Prefix", "PrefixFileError",
    "forward_with_prefix", "generate_mixed", "generate_with_prefix", "layout_of", "describe", "trainable_state",
    "use_prefix", "load_model", "load_prefix", "save_prefix", "export_peft", "import_peft",
    "Method", "METHODS", "get_method", "build", "attach", "load_artifact", "save_artifact", "WeightArtifact",
    "InfixConfig", "InfixModel", "PromptConfig", "PromptModel", "PTuningConfig", "PTuningModel",
]
