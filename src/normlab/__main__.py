from .cli import main
from .train.ranks import exit_process

exit_process(main())
