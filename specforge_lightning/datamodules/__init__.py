"""LightningDataModules: where the data plane, the target and the control plane are wired for one run.

``FeatureDataModule`` trains on prepared features (capturing them on first use);
``StreamDataModule`` trains while a colocated thread or a separate producer captures.
They live above ``data/`` because they start captures (``target/``) and join ledgers (``control/``).
"""

from specforge_lightning.datamodules.offline import FeatureDataModule
from specforge_lightning.datamodules.stream import StreamAck, StreamDataModule
from specforge_lightning.datamodules.transform import SampleTransform

__all__ = ["FeatureDataModule", "SampleTransform", "StreamAck", "StreamDataModule"]
