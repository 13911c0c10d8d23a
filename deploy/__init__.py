"""The one-host netns lab and the docker-compose cluster."""
