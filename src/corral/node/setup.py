"""Building this host's node from the settings, and the default image it needs."""

from __future__ import annotations

from corral.config import Settings
from corral.node.local import GIB, LocalNode, NodeConfig
from corral.runtime.images import DEFAULT_IMAGE, Image, Progress
from corral.runtime.spec import Runtime


def make_node(settings: Settings) -> LocalNode:
    return LocalNode(
        NodeConfig(
            root=settings.data_dir / "node",
            images_dir=settings.images_path,
            runtime=Runtime(settings.runtime),
            id_base=settings.sandbox_id_base,
            disk_pool_bytes=settings.disk_pool_gib * GIB,
            init_binary=settings.sandbox_init,
        )
    )


def ensure_default_image(node: LocalNode, progress: Progress | None = None) -> Image:
    """The default image, built from Debian packages the first time it is needed (about 20 s)."""
    image = node.images.get(DEFAULT_IMAGE)
    return image if image is not None else node.images.build(DEFAULT_IMAGE, progress=progress)
