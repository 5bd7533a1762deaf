"""Kubernetes resource quantities (`resource.Quantity`: "250m", "6Gi", "1e3"), exactly.

Capacities in ResourceSlices and consumed capacities in claims are quantities; they are read
and written here as Fractions, so 1/10000 of a device stays 1/10000 (never a float's
approximation) until the broker's limit is set from it.
"""
from __future__ import annotations

import re
from fractions import Fraction

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
            "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
            "P": Fraction(10**15), "E": Fraction(10**18)}
# apimachinery's grammar: <sign><digits>[.<digits>]<suffix>, the suffix binary, decimal or an exponent
_RE = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")


class QuantityError(ValueError):
    pass


def parse(text: object) -> Fraction:
    """A quantity's exact value; QuantityError for what Kubernetes would not accept."""
    if isinstance(text, int) and not isinstance(text, bool):    # JSON may carry a bare number
        return Fraction(text)
    if not isinstance(text, str) or len(text) > 64:
        raise QuantityError(f"not a quantity: {text!r}")
    m = _RE.match(text.strip())
    if m is None:
        raise QuantityError(f"not a quantity: {text!r}")
    sign, number, suffix = m.groups()
    value = Fraction(number)
    if suffix in _BINARY:
        value *= _BINARY[suffix]
    elif suffix and suffix[0] in "eE":
        exp = int(suffix[1:])
        if abs(exp) > 30:
            raise QuantityError(f"quantity out of range: {text!r}")
        value *= Fraction(10) ** exp
    else:
        value *= _DECIMAL[suffix or ""]
    return -value if sign == "-" else value


def render(value: Fraction | int) -> str:
    """A quantity's text: bytes as the largest binary unit that divides them ("6Gi"),
    fractions in the milli/micro/nano unit that makes them whole ("250m", "100u")."""
    value = Fraction(value)
    if value.denominator == 1:
        n = value.numerator
        for suffix, unit in reversed(_BINARY.items()):
            if n and n % unit == 0:
                return f"{n // unit}{suffix}"
        return str(n)
    for suffix in ("m", "u", "n"):
        scaled = value / _DECIMAL[suffix]
        if scaled.denominator == 1:
            return f"{scaled.numerator}{suffix}"
    raise QuantityError(f"{value} is finer than a nano unit: no quantity says it exactly")
