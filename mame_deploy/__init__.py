"""mame-deploy: token-merged (MaMe) Vision Mamba models, exported and checked for deployment."""

__version__ = "0.1.0"

from mame_deploy.errors import UserError  # noqa: E402
from mame_deploy.models import create_model, list_models  # noqa: E402
from mame_deploy.patch import patch  # noqa: E402  (the function shadows its module, as in ToMe)

__all__ = ["UserError", "__version__", "create_model", "list_models", "patch"]
