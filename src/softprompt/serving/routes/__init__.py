"""The server's routes, one FastAPI ``APIRouter`` per endpoint group, all over the app's
:class:`~softprompt.serving.service.Service`: OpenAI's completions, chat completions and model list
(:mod:`.completions`), classification (:mod:`.classify`), prompt management (:mod:`.prompts`) and
health (:mod:`.health`)."""

from softprompt.serving.routes import classify, completions, health, prompts

ROUTERS = (health.router, completions.router, classify.router, prompts.router)
"""Every router, in the order the app includes them."""

__all__ = ["ROUTERS"]
