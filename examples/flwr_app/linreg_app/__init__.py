"""A user's own Flower app: a linear regression trained with fedmf's DP strategy."""
