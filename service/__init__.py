"""Courier: RabbitMQ-driven file uploads to Inconvo and Mindset AI."""

__version__ = "0.1.0"
