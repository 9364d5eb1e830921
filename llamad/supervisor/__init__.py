"""The one owner of model state: decisions, unit lifecycle, backends, and the guards that
hook into them."""
