"""How bytes move: HTTP/1.1 client and server on asyncio protocols (parsing by llhttp), proxies, TLS, the gateway's
loop thread. Nothing here knows OpenAI or Jupyter, so the domain (``gateway``) and the doors build on it."""
