"""The TLP/PAP gate (Cortex's max TLP/PAP, stricter by default).

An external plugin sends the value to a third party: it only sees observables whose
TLP is at or below ``enrichment.max_tlp_external``. An active plugin touches the
target: it only sees observables whose PAP is at or below ``enrichment.max_pap_active``.
An unknown or missing level counts as RED: when in doubt, nothing leaves.
"""
from __future__ import annotations

from typing import Optional

# WHITE and CLEAR are the same level (TLP 2.0 renamed it); AMBER+STRICT sits below RED.
_RANK = {"WHITE": 0, "CLEAR": 0, "GREEN": 1, "AMBER": 2, "AMBER+STRICT": 3, "RED": 4}


def rank(level: Optional[str]) -> int:
    return _RANK.get((level or "").strip().upper(), _RANK["RED"])


def allows(level: Optional[str], maximum: str) -> bool:
    return rank(level) <= rank(maximum)


def refusal(plugin, tlp: Optional[str], pap: Optional[str], max_tlp: str, max_pap: str) -> Optional[str]:
    """Why ``plugin`` may not see this observable, or None when it may."""
    if getattr(plugin, "EXTERNAL", False) and not allows(tlp, max_tlp):
        return f"TLP:{tlp or 'unknown'} is above enrichment.max_tlp_external ({max_tlp}) for an external plugin"
    if getattr(plugin, "ACTIVE", False) and not allows(pap, max_pap):
        return f"PAP:{pap or 'unknown'} is above enrichment.max_pap_active ({max_pap}) for an active plugin"
    return None
