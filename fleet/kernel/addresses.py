"""Source addresses for load: ``--source-ips`` and a Dask worker's ``FLEET_SOURCE_IPS``."""

from __future__ import annotations

import ipaddress

from fleet.kernel.errors import UsageError

MAX_SOURCE_IPS = 1024


def parse_source_ips(text: str, *, what: str = "--source-ips") -> tuple[str, ...]:
    """``127.0.0.2-127.0.0.9`` or ``127.0.0.2,127.0.0.3``: loopback addresses only (load
    stays on this machine), 1 to 1024 of them; ``what`` names the setting in errors."""
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        for part in text.split(","):
            if "-" in part:
                first, last = (ipaddress.ip_address(x.strip()) for x in part.split("-", 1))
                if int(last) - int(first) >= MAX_SOURCE_IPS:
                    raise ValueError(f"more than {MAX_SOURCE_IPS} addresses")
                addresses += [ipaddress.ip_address(n) for n in range(int(first), int(last) + 1)]
            else:
                addresses.append(ipaddress.ip_address(part.strip()))
    except ValueError as exc:
        raise UsageError(f"invalid {what} {text!r}: {exc}") from None
    outside = [str(a) for a in addresses if not a.is_loopback]
    if outside:
        raise UsageError(
            f"{what} must be loopback addresses (127.0.0.0/8 or ::1), not {outside[0]}"
        )
    if not addresses or len(addresses) > MAX_SOURCE_IPS:
        raise UsageError(f"{what} must name between 1 and {MAX_SOURCE_IPS} addresses")
    return tuple(str(a) for a in addresses)
