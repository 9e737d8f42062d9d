"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) for engines that lack it.

vLLM serves the Messages API itself, and there the gateway passes it through. ``transformers serve``, older
engines and FIRST clusters without the route speak only chat completions, so for them a Messages request is
translated to a chat request (``request``), and the engine's answer back into a Message (``response``), a stream
of Anthropic events (``stream``) or a token count (``count_tokens``); every failure takes Anthropic's error shape
(``errors``). These modules are pure: they turn dicts and bytes into dicts and bytes, and leave all I/O to the
gateway, so one translation serves every door and backend.
"""
