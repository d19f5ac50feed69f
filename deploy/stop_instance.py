#!/usr/bin/env python3
"""Stop the RunPod pod or Vast instance this container runs in, so a one-shot training pod
stops billing GPU time when its job ends. The entrypoint runs it after the job when
TUNEJOB_STOP_INSTANCE=1 (deploy/runpod.md, deploy/vast.md).

RunPod sets RUNPOD_POD_ID and RUNPOD_API_KEY (a key scoped to the pod) in every pod; Vast
sets CONTAINER_ID and CONTAINER_API_KEY (scoped to the instance). Standard library only;
the key is sent in a header and never printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Mapping

RUNPOD_API = "https://rest.runpod.io/v1"
VAST_API = "https://console.vast.ai/api/v0"


def stop_request(env: Mapping[str, str]) -> tuple[str, urllib.request.Request] | None:
    """(provider, the API request that stops this instance), or None off RunPod and Vast."""
    if env.get("RUNPOD_POD_ID") and env.get("RUNPOD_API_KEY"):
        base = env.get("TUNEJOB_RUNPOD_API", RUNPOD_API)
        return "runpod", urllib.request.Request(
            f"{base}/pods/{env['RUNPOD_POD_ID']}/stop", method="POST",
            headers={"Authorization": f"Bearer {env['RUNPOD_API_KEY']}"})
    if env.get("CONTAINER_ID") and env.get("CONTAINER_API_KEY"):
        base = env.get("TUNEJOB_VAST_API", VAST_API)
        return "vast", urllib.request.Request(
            f"{base}/instances/{env['CONTAINER_ID']}/", method="PUT",
            data=json.dumps({"state": "stopped"}).encode(),
            headers={"Authorization": f"Bearer {env['CONTAINER_API_KEY']}",
                     "Content-Type": "application/json"})
    return None


def main(env: Mapping[str, str] = os.environ, attempts: int = 3) -> int:
    """Send the stop request (retried on network errors); 0 once the provider accepted it."""
    found = stop_request(env)
    if found is None:
        print("tunejob: TUNEJOB_STOP_INSTANCE=1, but this is neither a RunPod pod "
              "(RUNPOD_POD_ID, RUNPOD_API_KEY) nor a Vast instance (CONTAINER_ID, "
              "CONTAINER_API_KEY)", file=sys.stderr)
        return 1
    provider, request = found
    error = ""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                print(json.dumps({"event": "instance_stop_requested", "provider": provider,
                                  "http_status": response.status}), file=sys.stderr)
                return 0
        except urllib.error.HTTPError as err:
            error = f"HTTP {err.code}"
            if err.code < 500:  # refused (bad key, unknown id): a retry gets the same answer
                break
        except OSError as err:
            error = str(err)
        if attempt + 1 < attempts:
            time.sleep(min(2 ** attempt, 10))
    print(f"tunejob: could not stop this {provider} instance: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
