"""`alphaedit serve`: a local editing workbench over HTTP.

One process holds the model and its Editor (workbench.py); FastAPI serves the editing API, an
OpenAI-compatible endpoint for the edited model (openai_api.py) and a web page (page.html), all
described at /docs. Run it with `alphaedit serve --state DIR --model M`.
"""

from .app import create_app
from .workbench import Completion, Refused, Workbench

__all__ = ["Completion", "Refused", "Workbench", "create_app"]
