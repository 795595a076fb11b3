"""The HTTP surfaces: the signed webhook and read API (`oncelery api`), and the pages for people."""
