"""DSpark: the DFlash block draft with a Markov logit bias and a confidence head; drafting scheduled by confidence."""

from specforge_lightning.algorithms.dspark.drafter import DSparkBlockDrafter
from specforge_lightning.algorithms.dspark.export import DSparkFamily
from specforge_lightning.algorithms.dspark.heads import ConfidenceHead, MarkovHead
from specforge_lightning.algorithms.dspark.loss import DSparkLossOutput, dspark_loss
from specforge_lightning.algorithms.dspark.model import DSparkConfig, DSparkDraft
from specforge_lightning.algorithms.dspark.module import DSparkMetric, DSparkModule

ALGORITHM = DSparkFamily("dspark", DSparkModule, DSparkConfig, DSparkDraft, DSparkBlockDrafter).algorithm()

__all__ = [
    "ALGORITHM",
    "ConfidenceHead",
    "DSparkBlockDrafter",
    "DSparkConfig",
    "DSparkDraft",
    "DSparkFamily",
    "DSparkLossOutput",
    "DSparkMetric",
    "DSparkModule",
    "MarkovHead",
    "dspark_loss",
]
