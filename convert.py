"""Convert a Hugging Face LLaMA checkpoint to GGUF: python convert.py HF_DIR --outtype q4_0 -o OUT.gguf."""
import sys
from pathlib import Path

try:
    import lowbit  # noqa: F401  # an installed lowbit
except ImportError:
    # Running from a source checkout without installing: use the package next to this script.
    sys.path.insert(0, str(Path(__file__).resolve().parent / "python"))

from lowbit.converter import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
