"""recbole-llmgen: large language models as first-class RecBole recommenders.

``import recbole_llmgen`` registers the ``LLMGen`` model (and its trainer and defaults) with
RecBole and makes RecBole 1.2.1 run on today's numpy/pandas/torch and in its multi-process mode
(every change to RecBole is listed in :mod:`recbole_llmgen.patches`). That is the only import-time
side effect.
"""

from recbole_llmgen import patches

patches.install()

import os  # noqa: E402

from recbole_llmgen import registry  # noqa: E402
from recbole_llmgen.conversation import Session  # noqa: E402
from recbole_llmgen.integration import finalize_config  # noqa: E402
from recbole_llmgen.model import LLMGen  # noqa: E402
from recbole_llmgen.quick_start import run_recbole  # noqa: E402
from recbole_llmgen.recommend import recommend  # noqa: E402
from recbole_llmgen.trainer import LLMGenTrainer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLMGen", "LLMGenTrainer", "Session", "run_recbole", "recommend", "__version__"]

if "LLMGen" not in registry.plugin_models():
    registry.register_model(
        "LLMGen",
        LLMGen,
        os.path.join(os.path.dirname(__file__), "properties", "LLMGen.yaml"),
        trainer_class=LLMGenTrainer,
        finalize_config=finalize_config,
    )
