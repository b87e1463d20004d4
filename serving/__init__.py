"""The online service: HTTP app, routing between model slots, model pool and prediction log."""
