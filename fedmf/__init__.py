"""fedmf."""
