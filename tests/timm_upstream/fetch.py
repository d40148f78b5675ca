"""Copy timm's own tests/test_models.py (from the sdist of the installed timm version) next to this file.

    python tests/timm_upstream/fetch.py          # pip download --no-deps --no-binary :all: timm==<version>
"""
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

HERE = Path(__file__).resolve().parent


def main() -> int:
    version = timm.__version__
    target = HERE / 'test_models.py'
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
                        f'timm=={version}', '-d', tmp], check=True)
        sdist = next(Path(tmp).glob('timm-*.tar.gz'))
        with tarfile.open(sdist) as tar:
            member = tar.getmember(f'timm-{version}/tests/test_models.py')
            data = tar.extractfile(member).read()
    tmp_target = target.with_suffix('.tmp')
    tmp_target.write_bytes(data)
    tmp_target.replace(target)
    (HERE / 'TIMM_VERSION').write_text(version + '\n')
    print(f'timm {version}: tests/test_models.py -> {target} ({len(data):,} bytes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
