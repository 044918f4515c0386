"""Dialog correlation: SIP messages in, one CDR per call out."""

from sipcdr.dialog.correlator import Correlator, CorrelatorStats, DialogLimits

__all__ = ["Correlator", "CorrelatorStats", "DialogLimits"]
