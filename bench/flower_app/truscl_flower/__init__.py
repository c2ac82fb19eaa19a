"""truscl's demo task as a Flower app: the peer that ``bench/peers.py`` runs."""
