"""The devices a search or a trainer is given, checked once with an error naming what was passed."""
from __future__ import annotations

import jax


def check_devices(devices=None, what: str = "devices") -> tuple:
  """`devices` as a tuple of distinct jax Devices of one platform (None: all of `jax.devices()`).

  Raises:
    TypeError: not a sequence of jax.Device (a platform name such as 'cpu', a count, ...).
    ValueError: empty, the same device twice, or devices of several platforms.

  Example:
    >>> check_devices(jax.devices()[:4])
  """
  if devices is None:
    return tuple(jax.devices())
  if isinstance(devices, (str, bytes)):
    raise TypeError(f"{what} must be a sequence of jax.Device, got the string {devices!r}; for the devices of "
                    f"a platform pass jax.devices({devices!r}) (or leave {what} out for all devices).")
  if isinstance(devices, jax.Device):
    raise TypeError(f"{what} must be a sequence of jax.Device, got one device {devices}; pass [{devices}].")
  try:
    devices = tuple(devices)
  except TypeError:
    raise TypeError(f"{what} must be a sequence of jax.Device, got {type(devices).__name__} {devices!r}; "
                    "e.g. jax.devices()[:8].") from None
  bad = [d for d in devices if not isinstance(d, jax.Device)]
  if bad:
    raise TypeError(f"{what} must be a sequence of jax.Device, but it holds {type(bad[0]).__name__} {bad[0]!r}; "
                    "e.g. jax.devices()[:8].")
  if not devices:
    raise ValueError(f"{what} is empty; pass at least one device (e.g. jax.devices()).")
  seen, twice = set(), []
  for d in devices:
    if d in seen and d not in twice:
      twice.append(d)
    seen.add(d)
  if twice:
    raise ValueError(f"{what} lists the same device more than once ({', '.join(map(str, twice))}); each device "
                     f"can hold one share of the plan: pass distinct devices, e.g. jax.devices()[:{len(seen)}].")
  platforms = sorted({d.platform for d in devices})
  if len(platforms) > 1:
    raise ValueError(f"{what} mixes platforms {platforms}; a plan runs on devices of one platform.")
  return devices
