"""Operations: the embedded development stack (Tansu broker, Redis) and deployment files."""
