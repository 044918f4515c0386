"""Pure anti-fraud detectors: sliding windows over messages and closed calls, time
passed in, alerts out. `FraudMonitor` runs them; `FraudSettings` configures them."""

from sipcdr.fraud.incidents import FraudStats
from sipcdr.fraud.monitor import FraudMonitor
from sipcdr.fraud.settings import DETECTORS, FraudSettings, TrunkSettings

__all__ = ["DETECTORS", "FraudMonitor", "FraudSettings", "FraudStats", "TrunkSettings"]
