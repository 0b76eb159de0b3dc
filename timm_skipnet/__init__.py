"""timm-skipnet: SkipNet dynamic-depth ResNets for timm. ``import timm_skipnet`` registers the models."""
from .gates import GATE_TYPES, FeedForwardGates, RecurrentGates, create_gates
from .policy import POLICIES, GateDecision, decide, straight_through
from .skipnet import (
    EXECUTION_MODES,
    HUB_ORG,
    SkipNetResNet,
    SkipNetTrace,
    checkpoint_filter_fn,
    convert_to_skipnet,
)

__version__ = '0.2.0'

__all__ = [
    'EXECUTION_MODES', 'GATE_TYPES', 'HUB_ORG', 'POLICIES', 'FeedForwardGates', 'GateDecision', 'RecurrentGates',
    'SkipNetResNet', 'SkipNetTrace', 'checkpoint_filter_fn', 'convert_to_skipnet', 'create_gates', 'decide',
    'straight_through', '__version__',
]
