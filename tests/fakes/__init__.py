"""Loopback stand-ins for servers that cannot run here (Exchange EWS, Microsoft Graph, Google).

Each fake implements only the operations our connectors use, in the request and response
shapes Microsoft and Google publish (the fixtures under ``tests/fixtures/`` name the page each
shape is taken from). They listen on 127.0.0.1 with an ephemeral port and record every
request, so tests can assert the exact wire traffic.
"""
