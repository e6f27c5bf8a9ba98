"""Operations: what IT looks at and touches while the node runs: the HTTP side
(health, readiness, metrics, status page; ``web``) and ``sonocase status``.
"""
