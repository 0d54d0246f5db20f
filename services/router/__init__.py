"""Router: the public `loopline.v1.Router` API, experiments and forwarding (next issue)."""
