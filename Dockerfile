FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY media media
COPY vad vad
COPY duplex duplex
RUN pip install --no-cache-dir ".[redis]"
EXPOSE 8000
CMD ["duplex", "serve", "--host", "0.0.0.0"]
