from liveloop.cli import app

app(prog_name="liveloop")
