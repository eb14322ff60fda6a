"""prefixtune: exact prefix-tuning and its soft-prompt family on frozen Hugging Face LMs."""

__version__ = "0.1.0"

from .config import PrefixConfig  # noqa: E402
from .engine import (  # noqa: E402
    PrefixModel,
    RowPrefixes,
    forward_with_prefix,
    generate_mixed,
    generate_with_prefix,
    layout_of,
    trainable_state,
    use_prefix,
)
from .models import load_model  # noqa: E402
from .peft_io import export_peft, import_peft  # noqa: E402
from .prefix import MergedPrefix, Prefix, PrefixFileError, load_prefix, save_prefix  # noqa: E402

__all__ = [
    "PrefixConfig", "PrefixModel", "RowPrefixes", "MergedPrefix", "Prefix", "PrefixFileError",
    "forward_with_prefix", "generate_mixed", "generate_with_prefix", "layout_of", "trainable_state",
    "use_prefix", "load_model", "load_prefix", "save_prefix", "export_peft", "import_peft",
]
