"""The gateway's HTTP face: the one route table, and the doors built from it (the lean door on the gateway's own
server, the tornado door that Jupyter's extension and ``first serve`` use). The domain (``gateway``) knows no
door; a door knows the domain only through the table's answering functions."""
