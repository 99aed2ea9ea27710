"""One engine call for several decoded requests: the compute step of a service batch.

Rows of all requests are grouped by (pixel column, kept count, pixel dtype), each group
runs as one engine forward, and every request gets its rows back in its own order. This
module needs torch but not Ray, so the merging can be tested without a cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from teacher_service.engine import MaskedTeacher
from teacher_service.protocol import DecodedRequest, ProtocolError, RowGroup

logger = logging.getLogger(__name__)

GroupKey = tuple[str, int, str]


def run_requests(
    engine: MaskedTeacher, requests: Sequence[DecodedRequest]
) -> list[np.ndarray | ProtocolError]:
    """Run the teacher on every row of several requests, with one forward per row group.

    Args:
        engine: the masked teacher.
        requests: decoded, validated requests.

    Returns:
        Per request, float32 logits [num_images, num_classes] in request row order, or
        a 422 `ProtocolError` when the engine rejected that request's rows.
    """
    outputs: list[np.ndarray | ProtocolError] = [
        np.empty((request.num_images, engine.num_classes), dtype=np.float32) for request in requests
    ]
    buckets: dict[GroupKey, list[tuple[int, RowGroup]]] = {}
    for request_index, request in enumerate(requests):
        for group in request.groups:
            key = (group.kind, group.keep_count, str(group.pixels.dtype))
            buckets.setdefault(key, []).append((request_index, group))

    for members in buckets.values():
        try:
            logits: np.ndarray | None = forward_groups(engine, [group for _, group in members])
        except ValueError as err:
            # The decoder validated every row, so this is not expected. Retry each request
            # alone, so that one bad request cannot fail the others in its batch.
            logger.warning("merged forward of %d requests failed: %s", len(members), err)
            logits = None
        offset = 0
        for request_index, group in members:
            output = outputs[request_index]
            count = len(group.rows)
            if isinstance(output, ProtocolError):
                pass
            elif logits is not None:
                output[group.rows] = logits[offset : offset + count]
            else:
                try:
                    output[group.rows] = forward_groups(engine, [group])
                except ValueError as err:
                    outputs[request_index] = ProtocolError(422, "invalid_content", str(err))
            offset += count
    return outputs


def forward_groups(engine: MaskedTeacher, groups: Sequence[RowGroup]) -> np.ndarray:
    """Run the engine on row groups that share pixel column, kept count and dtype.

    Returns:
        float32 logits [sum of group sizes, num_classes], groups in the given order.
    """
    pixels = torch.from_numpy(np.concatenate([group.pixels for group in groups]))
    keep = torch.from_numpy(np.concatenate([group.keep for group in groups]))  # [n, K]
    if groups[0].kind == "patches":
        logits = engine.forward_patches(pixels, keep)  # pixels [n, K, C*ph*pw]
    else:
        logits = engine.forward_images(pixels, keep)  # pixels [n, C, H, W]
    return logits.cpu().numpy()
