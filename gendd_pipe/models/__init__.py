"""Teacher networks (timm) and the weights they load."""
