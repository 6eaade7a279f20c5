"""Upstream discipline (DESIGN §7): a router, shared limits, adaptive rate, retries, circuit breakers,
fallbacks and pools over several OpenAI-compatible endpoints.

It knows nothing of chat or embeddings: :class:`~ragline.llm.gateway.GatewayLLM` and
:class:`~ragline.embed.remote.OpenAIEmbedder` supply the wire call and sit on top of it, which is why
it is a package below ``llm`` and ``embed`` rather than inside one of them.
"""

from ragline.gateway.core import Gateway, Ticket, classify
from ragline.gateway.state import Limits, LocalState, Verdict

__all__ = ["Gateway", "Limits", "LocalState", "Ticket", "Verdict", "classify"]
