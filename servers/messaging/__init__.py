"""The messaging service: inter-agent messages and the event stream.

Serves MessagingService and EventsService.
"""
